"""exports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 10:12:31.696132

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('exports',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('request_digest', sa.String(length=71), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('loreg_version', sa.String(length=64), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("request_digest LIKE 'sha256:%' AND length(request_digest) = 71", name=op.f('ck_exports_request_digest_sha256')),
    sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name=op.f('ck_exports_state_valid')),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_exports_base_model_id_base_models'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_exports')),
    sa.UniqueConstraint('request_digest', name=op.f('uq_exports_request_digest'))
    )
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exports_base_model_id'), ['base_model_id'], unique=False)
        batch_op.create_index('ix_exports_state_created', ['state', 'created_at'], unique=False)

    op.create_table('export_files',
    sa.Column('export_id', sa.String(length=32), nullable=False),
    sa.Column('path', sa.String(length=256), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.CheckConstraint("digest LIKE 'sha256:%' AND length(digest) = 71", name=op.f('ck_export_files_digest_sha256')),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_export_files_digest_blobs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['export_id'], ['exports.id'], name=op.f('fk_export_files_export_id_exports'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('export_id', 'path', name=op.f('pk_export_files'))
    )
    with op.batch_alter_table('export_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_export_files_digest'), ['digest'], unique=False)

    op.create_table('export_inputs',
    sa.Column('export_id', sa.String(length=32), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('manifest_digest', sa.String(length=71), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['export_id'], ['exports.id'], name=op.f('fk_export_inputs_export_id_exports'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_export_inputs_version_id_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('export_id', 'position', name=op.f('pk_export_inputs'))
    )
    with op.batch_alter_table('export_inputs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_export_inputs_version_id'), ['version_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('export_inputs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_export_inputs_version_id'))

    op.drop_table('export_inputs')
    with op.batch_alter_table('export_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_export_files_digest'))

    op.drop_table('export_files')
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index('ix_exports_state_created')
        batch_op.drop_index(batch_op.f('ix_exports_base_model_id'))

    op.drop_table('exports')
