"""combinations: jobs that combine adapter versions into a new version, and their inputs (lineage)

Revision ID: 0006c
Revises: 0005
Create Date: 2026-12-03 11:30:00.000000

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).
"""
from alembic import op
import sqlalchemy as sa


revision = '0006c'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('combinations',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('request_digest', sa.String(length=71), nullable=False),
    sa.Column('requested_by', sa.String(length=32), nullable=True),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('target', sa.String(length=160), nullable=False),
    sa.Column('aliases', sa.JSON(), nullable=False),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('result_name', sa.String(length=160), nullable=True),
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
    sa.CheckConstraint("request_digest LIKE 'sha256:%' AND length(request_digest) = 71", name=op.f('ck_combinations_request_digest_sha256')),
    sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name=op.f('ck_combinations_state_valid')),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_combinations_base_model_id_base_models'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_combinations_version_id_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_combinations')),
    sa.UniqueConstraint('request_digest', name=op.f('uq_combinations_request_digest'))
    )
    with op.batch_alter_table('combinations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_combinations_base_model_id'), ['base_model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_combinations_version_id'), ['version_id'], unique=False)
        batch_op.create_index('ix_combinations_state_created', ['state', 'created_at'], unique=False)

    op.create_table('combination_inputs',
    sa.Column('combination_id', sa.String(length=32), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=160), nullable=False),
    sa.Column('manifest_digest', sa.String(length=71), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['combination_id'], ['combinations.id'], name=op.f('fk_combination_inputs_combination_id_combinations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_combination_inputs_version_id_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('combination_id', 'position', name=op.f('pk_combination_inputs'))
    )
    with op.batch_alter_table('combination_inputs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_combination_inputs_version_id'), ['version_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('combination_inputs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_combination_inputs_version_id'))
    op.drop_table('combination_inputs')
    with op.batch_alter_table('combinations', schema=None) as batch_op:
        batch_op.drop_index('ix_combinations_state_created')
        batch_op.drop_index(batch_op.f('ix_combinations_version_id'))
        batch_op.drop_index(batch_op.f('ix_combinations_base_model_id'))
    op.drop_table('combinations')
